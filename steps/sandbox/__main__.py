"""``python -m steps.sandbox``: prints the mode and what it guarantees for each language."""
from steps.sandbox import main

main()
