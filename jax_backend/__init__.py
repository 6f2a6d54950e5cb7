"""JAX/Optax backend of curvopt (public entry point: ``curvopt.optax``)."""
__all__: list[str] = []
