/** OHIF (@ohif/app 3.13 prebuilt dist) reading one Orthanc through the same origin.
 *
 * serve_ohif.py serves this dist and proxies /dicom-web to Orthanc's DICOMweb plugin, so the
 * browser never needs CORS (Orthanc 1.10 has none) and never talks to another host.
 * What shows (tests/test_ohif_viewer.py): the mammograms, our TID 1500 SR ("AI regions and
 * scores": a region per view labelled "Probability of cancer"), the labelmap SEGs ("AI region
 * overlay <view>", output kind labelmap_seg) over their mammograms and the SC heat-maps ("AI
 * heat-map"). OHIF refuses the CAD SR and the fractional SEG; the mammo-ai overlay viewer in
 * Orthanc (/mammo-ai/studies/{id}) draws the SEG's probabilities.
 * Four views 2x2: /viewer?StudyInstanceUIDs=<uid>&hangingProtocolId=@ohif/mnGrid
 */
// A reading station: no onboarding tour over the first study (OHIF remembers shown tours in
// localStorage; an existing choice is kept).
if (window.localStorage && localStorage.getItem('shownTours') === null) {
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
}

window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  // No telemetry, no external services.
  investigationalUseDialog: { option: 'never' },
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: false,
  maxNumberOfWebWorkers: 3,
  // OHIF calls this for a failed image or metadata request; without it, 3.13 throws
  // "handler is not a function" instead of saying what failed.
  httpErrorHandler: (error) => {
    const status = error && (error.status || (error.request && error.request.status));
    console.error(`DICOMweb request failed (HTTP ${status || '?'}): ${error && error.message}`);
  },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (mammo-ai)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
