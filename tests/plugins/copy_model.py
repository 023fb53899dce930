"""A user model whose forward copies a transposed (non-contiguous) tensor into a buffer."""
import torch


class CopyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        buf = torch.empty(x.shape[1], x.shape[0])
        buf.copy_(x.t())
        return self.proj(buf)


def build():
    torch.manual_seed(0)
    return CopyNet(), torch.randn(16, 8)
