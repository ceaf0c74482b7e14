"""Reference search (the retrieval step): ``search`` the search both gallery kinds share (over a
``Store``), ``coordinates`` the bundle's coordinate gallery, ``photos`` the analyst's photo gallery and
its format on disk, ``photo_writer`` / ``photo_build`` building one, ``sources`` what it is built from."""
