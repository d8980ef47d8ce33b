"""A volume at one instant while it stays in use: the providers (none, freeze, cow), the freeze
guard, the copy-on-write store (cow/) and the managed-volume daemon (daemon/)."""
