"""How a worker's model is split across GPUs beyond data parallelism: ``layout.py`` (the
``[parallel]`` strategy on this world: the mesh, FSDP2, the data-parallel rank),
``tp.py`` (tensor parallelism: the built-in Llama's plan, torchtitan's)."""
