"""Knowledge distillation: teachers, students, losses and the `distill` stage."""
