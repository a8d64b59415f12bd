"""`refloop simulate`: scenarios run through the real engine on a virtual clock."""
