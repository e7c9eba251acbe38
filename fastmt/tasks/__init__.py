"""The training tasks: each builds its models, data and step and hands them to ``fastmt.engine.loop``."""
