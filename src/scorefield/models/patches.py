"""The patch bank and the streaming patch-posterior kernel that all local score machines share."""
