"""The operator's web page, ``/mirror/ui``: what is cached, what is filling, what it saved, and the actions.

- :mod:`.session`: sign-in with an API key kept in a signed cookie, and the CSRF token of each session;
- :mod:`.assets`: the page's CSS and JavaScript, shipped in the package and served under content hashes;
- :mod:`.live`: the live downloads as Server-Sent Events, and the last errors;
- :mod:`.page`: the routes (the page, its state document, the stream, the actions).
"""
