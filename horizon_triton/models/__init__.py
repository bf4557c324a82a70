"""Model families: the op table every family computes with (ops) and one folder per layer template (dense/).
Imports config and the kernels only."""
