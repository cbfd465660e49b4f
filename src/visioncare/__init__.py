"""VisionCare: grade diabetic retinopathy (DR, 5 grades) and macular edema (DME, 3) at once."""

__version__ = "0.1.0"

DR_CLASSES = 5
DME_CLASSES = 3
TASKS: dict[str, int] = {"dr": DR_CLASSES, "dme": DME_CLASSES}
IGNORE_INDEX = -1  # a label of -1 means "not graded for this task"
