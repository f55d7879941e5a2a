"""The MHPO Monitor dashboard: Dash pages over the HTTP query API (`mhpo_dashboard.app.create_dash`)."""
