"""A photo's own metadata: TIFF/EXIF, XMP and the containers that hold them."""
