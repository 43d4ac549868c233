"""The model registry: validation, the SQL store (no Ray), its migrations, the Ray actor and
the driver-side client; import each name from the module that defines it."""
