"""Before a run: the meta-device dry run (dryrun), kernels' cost models (kernel_models), ht.plan (plan) and the
engine's preflight (preflight). Imports everything below the engine; the engine reaches it through preflight."""
