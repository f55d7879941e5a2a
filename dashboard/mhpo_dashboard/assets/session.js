// With a login (auth on): when the session ends while a page is open (logged out in another
// tab, expired, token revoked), Dash's requests answer 401; reload so the server sends the
// viewer to the login form instead of leaving a page that silently stopped updating.
(function () {
  var originalFetch = window.fetch;
  window.fetch = function () {
    return originalFetch.apply(this, arguments).then(function (response) {
      if (response.status === 401 && response.url.indexOf("/_dash-") !== -1) {
        window.location.reload();
        return new Promise(function () {});  // the page is going away: Dash need not handle the answer
      }
      return response;
    });
  };
})();
