"""Offline: dataset, tf.data pipeline, model, export, train, evaluate (the only TensorFlow)."""
