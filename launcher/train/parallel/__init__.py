"""How a worker's model is split across GPUs beyond data parallelism: ``tp.py`` (tensor
parallelism: the built-in Llama's plan, torchtitan's)."""
