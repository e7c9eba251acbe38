"""Text classification, MT-BERT: co-finetuning the teachers, distilling the student, evaluating."""
