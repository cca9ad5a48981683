"""Plain PyTorch references: readable, materialising, exact in float64. They are the
``backend="reference"`` implementations and the oracle of every kernel test."""
