"""Any transformers decoder through its own layer code: the configuration (config), each layer's parameters and
their checkpoint names (weights), the layer template that binds transformers' decoder-layer modules to views of
a staging slot (template), and the attention implementation and masks it registers with transformers
(attention). Imports models.layout; transformers and torch."""
