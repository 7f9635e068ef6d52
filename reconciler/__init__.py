"""reconciler: keeps pools of prebuilt workspaces ready."""
