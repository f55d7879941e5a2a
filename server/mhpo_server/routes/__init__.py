"""One router per resource; `mhpo_server.app.create_app` includes them all."""
