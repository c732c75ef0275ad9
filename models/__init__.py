"""The encoders filterkit ships (installed as the package ``filterkit.models``)."""
