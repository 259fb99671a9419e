"""Small helpers shared by every core package."""
