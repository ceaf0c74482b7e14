"""What comes in: paths discovered into files and bytes, images decoded safely, their metadata."""
