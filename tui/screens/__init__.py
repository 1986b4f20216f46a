"""The TUI's tabs: one module per tab, each a `NodePane` fed by the app's event stream."""
