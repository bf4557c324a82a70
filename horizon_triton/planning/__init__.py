"""Before a run: the meta-device dry run (dryrun), the kernels' cost models (kernel_models), ht.plan (plan) and the
engine's preflight (preflight). Imports every package below the engine; the engine imports only preflight."""
