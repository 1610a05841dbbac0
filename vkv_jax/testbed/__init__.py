"""Synthetic shapes visual QA (`synthetic`), its closed vocabulary and tokenizer (`vocab`), and the
training of the shipped tiny model (`train`; the recipe and its study are in README.md)."""
