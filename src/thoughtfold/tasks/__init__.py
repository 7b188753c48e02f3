"""Tasks and data: dataset sources, one file per procedural task, answers, rewards, grading."""
