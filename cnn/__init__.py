"""Image classification (CIFAR-10 / MNIST recipes and the research toolkit). Importing it registers
the task "cnn"."""
from cnn import task  # noqa: F401  (registers the task)
