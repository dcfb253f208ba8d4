"""gpuyard: the deciders (pure) and the shell around them (engine, API, executors, CLI)."""
