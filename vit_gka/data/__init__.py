"""Data sets, transforms and loaders, and the seeded training order that makes resume exact."""
