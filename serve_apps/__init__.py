"""Ray Serve application builders, importable as `serve_apps.<module>:<builder>` from the repository root."""
