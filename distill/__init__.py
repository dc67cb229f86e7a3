"""Distillation: teachers, losses, pruning (a student from a teacher), knowledge shedding."""
