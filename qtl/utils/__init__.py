"""Infrastructure every box of the data flow shares: atomic files, locks, roots."""
