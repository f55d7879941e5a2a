"""The MHPO Monitor dashboard: Dash pages over the HTTP query API (`dashboard.app.create_dash`)."""
