"""OAuth2 sign-in: SASL XOAUTH2 / OAUTHBEARER, token sources, the token store and broker.

- :mod:`engine.oauth.sasl`: what the client sends and what a refusal means; protocol-neutral,
  for the POP3 gateway (its own ``AUTH`` exchange), the SMTP send (smtplib's ``auth``) and
  an IMAP gateway (imaplib's ``authenticate``); its docstring shows the IMAP call.
- :mod:`engine.oauth.sources`: msal (Microsoft) and authlib (Google, generic) behind four
  blocking calls: client credentials, refresh, device code start and finish.
- :mod:`engine.oauth.store`: one 0600 JSON record per account in ``DATA_DIR/oauth``,
  written atomically; a rotated refresh token is durable before it is used.
- :mod:`engine.oauth.broker`: :class:`TokenBroker`, the one place tokens come from: refresh
  ahead of expiry under a per-account lock, every token registered with the log scrubber.

A gateway takes the broker from its factory (:data:`engine.gateways.GATEWAYS`); a refused
token or refresh is an :class:`engine.errors.OAuthError` (outage cause ``oauth``).
"""
