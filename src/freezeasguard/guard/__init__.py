"""Choosing what to freeze: the mask and its selection (mask), the update maths (bilevel), one
mask update (mask_updates), the simulated users it draws (users), and Algorithm 1 (learn)."""
