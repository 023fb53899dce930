"""A model whose parent changes a child's output in place after the child returned (the child's
record then no longer holds what the child produced): live comparison must not trust such records."""
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 64)

    def forward(self, x):
        y = self.proj(x)
        y.mul_(0.5)  # in place on the child's output: its recorded value is gone
        return self.out(torch.relu(y))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def make():
    torch.manual_seed(0)
    return Net(), torch.randn(8, 32, 64)


def bad_last_out(model):
    """The last block's output projection reads other weights."""
    with torch.no_grad():
        model.blocks[2].out.weight.mul_(1.5)
    return model
