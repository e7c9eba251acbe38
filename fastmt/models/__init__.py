"""Models: teachers with the shared head, the student, model dirs on disk, batched teachers."""
