"""Tenants: tokens bound to scope grants and permissions, the guard that narrows each call by them, quotas."""
