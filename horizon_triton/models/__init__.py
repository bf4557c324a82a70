"""Model families: the op table every family computes with (ops), a layer's flat parameter layout (layout), and
one folder per layer template (dense/). Imports config and the kernels only."""
