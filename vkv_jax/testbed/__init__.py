"""Synthetic shapes visual QA (`synthetic`), its closed vocabulary and tokenizer (`vocab`), and the
training-recipe study for the shipped tiny model (`recipe_study`, a study script; see README.md)."""
