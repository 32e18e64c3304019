"""The driver side of a job: Ray Train's ``TorchTrainer`` set-up and resume point, the checks
made before Ray starts, worker counts and batch splits, the console and the run's records.

Entry point: :func:`launcher.run.driver.run` (what ``sharded-ams train`` calls).
"""
