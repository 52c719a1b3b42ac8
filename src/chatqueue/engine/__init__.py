"""The step loop off the event loop, and the model runners it drives."""
