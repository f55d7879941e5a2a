// MLflow clients print a run's link as <tracking URI>/#/experiments/<id>/runs/<run id>; with the
// tracking URI pointing at this server, open that run's page instead of the runs list.
(function () {
  var match = window.location.hash.match(/^#\/experiments\/[^/]+\/runs\/([0-9a-fA-F-]{32,36})\/?$/);
  if (match) {
    var base = window.location.pathname.replace(/\/?$/, "/");
    window.location.replace(base + "runs/" + match[1]);
  }
})();
