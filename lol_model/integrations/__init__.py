"""Integrations with other libraries: :mod:`lol_model.integrations.diffusers`."""
