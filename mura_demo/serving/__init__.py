"""Serving: the predictor, the reading rules, the Gradio app, batch runs, reports and uploads.
It imports the core, never training."""
