"""A user model with a hostile module name, for the HTML escaping test."""
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("<script>alert(1)</script>", torch.nn.Linear(8, 8))

    def forward(self, x):
        return getattr(self, "<script>alert(1)</script>")(x)


def build():
    torch.manual_seed(0)
    return Net(), torch.randn(4, 8)


def break_it(model):
    with torch.no_grad():
        getattr(model, "<script>alert(1)</script>").weight.mul_(2)
    return model
