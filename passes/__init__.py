"""Graph passes over the canonical ATen FX graph. They import torch (and networkx), never TVM."""
