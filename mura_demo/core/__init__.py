"""The core, what every use of the model needs: config, model, weights, image in, preprocessing,
inference, explanations and presentation. It imports nothing from serving or training."""
