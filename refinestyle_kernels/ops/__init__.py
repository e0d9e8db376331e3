"""The ops: one file each, holding the op's kernels, autograd and reference side by side."""
